"""What the operator and the rank runtime agree on about hung collectives (issue 17); no torch.

The operator sets COLLECTIVE_TIMEOUT_ENV from spec.restart.collectiveTimeoutSeconds; a rank whose
watchdog (largemodel.runtime.watchdog) fires exits with EXIT_HUNG, which the operator names when
it recreates the group.
"""

COLLECTIVE_TIMEOUT_ENV = "COLLECTIVE_TIMEOUT_SECONDS"
EXIT_HUNG = 5
