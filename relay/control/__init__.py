"""
The control plane: the AMP commands, the control server, relayctl, the live
event stream and the Prometheus metrics.
"""
