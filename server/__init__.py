"""Flower ServerApp and strategies for fedortho (thin adapters over ``fedortho``)."""
