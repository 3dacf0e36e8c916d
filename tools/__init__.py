"""Tools around the Hub package (`msvit.tools`): Hub export, gate maps, generated Markdown sections (not uploaded to
the Hub)."""
