"""The simulated VM: guest memory, vCPU workload, VF drivers."""
