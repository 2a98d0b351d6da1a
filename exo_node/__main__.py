from exo_node.cli import main

main()
