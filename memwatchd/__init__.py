"""memwatchd: a memory watchdog that stops a runaway process, unit or cgroup before the host stalls."""

__version__ = "0.1.0"
