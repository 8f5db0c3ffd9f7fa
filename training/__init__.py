"""Training the teacher's adapters: examples drawn from one user's record, a catalog-only loss."""
