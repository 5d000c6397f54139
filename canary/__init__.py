"""canary: retrain from feedback, gate offline, canary in Triton, promote or roll back.

See canary/README.md.
"""
