"""The choose stage: criteria and decisions (criteria.py), the `Chooser` that scores and decides
(chooser.py), a group plan against its members' own (units.py), symbolic N (dynamic.py) and
the memory budget (budget.py).

Imports only `cost` and `ir` (tests/test_package.py)."""
