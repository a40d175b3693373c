"""What gets built from the agent for gateways: the systemd unit and the Debian package.

`images.deb` builds `citygate_<version>_<arch>.deb` (`python3 -m images.deb`);
`images/systemd/` holds the hardened unit it installs. Nothing here runs on a gateway.
"""
