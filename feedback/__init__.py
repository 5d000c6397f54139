"""feedback: event log, join into labels, north-star metrics, closed-loop simulator.

See feedback/README.md.
"""
