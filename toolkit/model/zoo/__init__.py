"""dcnc's model zoo: DCN cross layers (cross.py), tower blocks (towers.py), the three families (families.py)."""
