"""Ground helpers every layer may use: durable files, retries, typed configs, figures."""
