"""Data: ingest raw transactions, clean them, split them by basket, write one silo per region."""
