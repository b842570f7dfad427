"""The wire layer, sans-IO: ASAP and ENRP messages and parameters, the PE<->PU session messages, framing, the cookie."""
