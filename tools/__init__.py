"""Repository tools around the Hub package: presets, Hub export, gate maps and the demo (not uploaded to the Hub)."""
