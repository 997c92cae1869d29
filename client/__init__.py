"""Flower ClientApp for fedortho (thin adapter over ``fedortho.train``)."""
