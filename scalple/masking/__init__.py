"""Masking of personal data in audited query text: literal lexer (scalple._wire) plus masks."""
