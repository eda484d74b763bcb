"""Run records, below the Flower adapter: the signed, hash-chained privacy ledger
(:mod:`bract.records.ledger`) and the rosters that name who may sign it.

Pure: imports neither flwr nor torch. ``bract.flower`` writes these records and
``bract.audit`` checks them; neither of those is imported from here.
"""
