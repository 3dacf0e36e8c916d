"""Tools around the Hub package (`msvit.tools`): Hub export, gate maps, README sections (not uploaded to the Hub)."""
