"""Stores built only from events: L1, L2, the ledger, and the read API over them."""
