"""Scenario engine: TOML scenario files -> validated cases -> steps run in a guest -> verdicts.

Modules: schema (vocabulary), loader (validation, matrix expansion), model (loaded data),
agent (guest-side helper), session (host side of it), steps (what each step does), health
(kernel checks after a case), runner (guests, deadlines, verdicts), result (a verdict),
report, progress, catalog (names -> files), cli."""
