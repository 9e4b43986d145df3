"""What the backend decided, for people: the live record of one compiled graph
(graph_report.py), its JSON document (document.py), the markdown and log lines rendered from a
document (render.py), the debug dump (debug.py), the model's LoRA modules no graph held
(outside.py), and `python -m runlora_fx.report` (cli.py). It only serialises what the
decisions carry: nothing here plans or costs.

Imported only by the top (backend.py, explainer.py, coverage.py, weight_guard.py;
tests/test_package.py)."""
