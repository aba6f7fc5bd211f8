"""Test helpers: certificates, in-process and subprocess servers, a protos-only client script."""
