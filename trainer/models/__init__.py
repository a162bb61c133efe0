"""Model families and the loaders they share."""
