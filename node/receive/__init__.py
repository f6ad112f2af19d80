"""Receiving instances: DIMSE C-STORE SCP and DICOMweb STOW-RS, sharing one durable write path."""
