"""`python -m fineflax.soup`: the program of fineflax/cli/soup.py, whose docstring is its
--help."""

from fineflax.cli import soup

if __name__ == '__main__':
  soup.main()
