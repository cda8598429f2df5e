"""The application on top of the definitions: the CLI, the runner, the demo loop and the evaluations."""
