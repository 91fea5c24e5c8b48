"""``python -m dmfnet ...``."""


from dmfnet.cli import run

if __name__ == "__main__":  # the model process (spawn) imports this module again as __mp_main__
    run()
