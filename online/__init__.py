"""The online state shared by every replica: per-user features read at request time."""
