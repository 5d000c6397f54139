"""Fairness audits: consumer-side quality by user group, provider-side exposure, gates.

Import from the modules (this package file imports nothing, so `northstar --help` does not
pay for Fairlearn):

    fairness.audit     run_audit(AuditConfig(run=..., data=...)) -> AuditResult (a trained
                       run, test period); audit(AuditInput, AuditConfig); load_audit(path)
    fairness.inputs    AuditInput, make_audit_input(...): ranked lists from anywhere
    fairness.groups    per-user metrics by user group (Fairlearn's MetricFrame)
    fairness.exposure  item-side exposure: shares, Gini, popularity bias
    fairness.gates     check_gates(result, GateConfig, baseline=None) -> GateResult; compare
    fairness.online    online_by_group(feedback=..., users=...): CTR / value by group, version
    fairness.report    write_report(out, result, gates, comparison): audit.json, report.html
    fairness.cli       `northstar audit`
"""
