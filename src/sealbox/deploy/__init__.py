"""Creating deployments (``sealbox init --dev``)."""
