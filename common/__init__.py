"""Ground helpers every layer may use: durable files, strict JSON, retries, typed configs,
figures and HTML report templates."""
