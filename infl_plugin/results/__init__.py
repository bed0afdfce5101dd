"""What an attribution produced, as plain data (`AttributionResult`, `TokenViews`), and its files."""
