"""studies: research on the product, kept apart from it.

Each study drives the product's packages (the simulator, serving, the canary loop) and
writes a results JSON and figures; none of the product imports a study. Modules:
`freshness` (live online features vs the frozen snapshot, on Triton), `freshness_cycles`
(retrain cycles in the closed loop), `replay` (a run's request stream re-served by the
oracle), `depth` (which live state makes CTR fall), `label_tiers` (what each label tier
is worth), `stability_study` (churn with and without the stability term), `cli` (their
commands). Results: studies/FRESHNESS.md.
"""
