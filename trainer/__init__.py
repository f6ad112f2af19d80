"""Model training: datasets -> plan -> train -> evaluate -> export -> model bundle."""
