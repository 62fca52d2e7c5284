"""`python -m memwatchd` runs the CLI."""
from memwatchd.entry import main

main()
