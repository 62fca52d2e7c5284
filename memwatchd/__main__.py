"""`python -m memwatchd` runs the CLI."""
from memwatchd.cli import main

main()
