"""The daemon's face to systemd and to its operator: sd_notify, the status file (written and
read), and its own long-lived tasks, supervised and watched for progress."""
