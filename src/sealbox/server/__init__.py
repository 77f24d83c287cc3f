"""The signing server (``sealbox serve``): HTTPS, classic wire protocol, content-addressed jobs."""
