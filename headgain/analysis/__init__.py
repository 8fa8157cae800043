"""Looking at the heads: the head census, contribution maps and their heat maps."""
