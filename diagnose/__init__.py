"""Why the north star moved: ranked causes with evidence, and a remediation plan."""
