"""Model families (one module each, listed in models/registry.py), their pure-torch models
for training, the family-aware file functions and the reproduction importer."""
