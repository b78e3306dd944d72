"""Configuration: `parsing` turns a YAML file plus command-line overrides into dataclasses (with a help
string per field); `trainer` and `server` hold each process's dataclasses and their checks."""
