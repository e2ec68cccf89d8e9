"""The library's version, in a leaf module so that every room can record it without importing the
package face (which imports nearly everything)."""

__version__ = "0.1.0"
