"""The result drivers: each runs one study end to end through the training library's typed entry points and writes
its results, figures and generated Markdown section (`python -m msvit.experiments.<name> --help`)."""
