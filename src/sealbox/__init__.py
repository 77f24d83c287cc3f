"""sealbox: a code-signing service wire-compatible with the classic Mozilla signing server.

Public API: :mod:`sealbox.client` (sign files through servers), :mod:`sealbox.server.tokens`
(mint and check upload tokens) and :mod:`sealbox.formats` (the signer registry).
"""

__version__ = "0.1.0"
