"""Federation over Flower: regions train adapters next to their data; only adapters travel."""
