"""What the scripts share: cli.py (--key=value options, --help, the device, one-line errors);
shapes.py prints a preset's data flow, module by module, with real shapes and parameter counts."""
