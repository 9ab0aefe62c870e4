"""Pure maths of proxy tuning: no I/O, no globals, every random draw from an explicit generator."""
