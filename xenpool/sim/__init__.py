"""The simulator: real registrar, PE and PU code on a virtual clock, with simulated hypervisors."""
