"""The shared core: everything two or more method packages need (see DESIGN.md for what each module owns)."""
