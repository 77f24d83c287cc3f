"""Unsigned Android APK and Java JAR inputs (demo, bench, tests): the writers the Android signer
also uses for its start-up probe, in :mod:`sealbox.formats._apk`."""

from ..formats._apk import ANDROID_NS, binary_manifest, write_apk, write_jar

__all__ = ["ANDROID_NS", "binary_manifest", "write_apk", "write_jar"]
