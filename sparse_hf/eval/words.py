"""A fixed list of common English words used to build synthetic haystacks and word tasks.

Shipping the list in the code keeps every synthetic task reproducible offline: the same seed gives the same
text on every machine, with no download.
"""

_RAW = """
able about above accept across act add admit afraid after again age agree air allow almost alone along
already also always amount angry animal answer apple area arm army around arrive art ask attack aunt autumn
away baby back bad bag ball bank base basket bath bear beautiful bed bee before begin behind believe bell
belt bench berry better between bicycle bird birth bite black blade blanket blood blow blue board boat body
bone book boot border bottle bottom bowl box boy brain branch brave bread break breakfast breath brick
bridge bright bring brother brown brush bucket build burn busy butter button cake call calm camera camp
candle cap captain car card care carpet carry castle cat catch cause cave chain chair chalk chance change
cheap cheese cherry chicken child chin church circle city clean clear clever cliff climb clock close cloth
cloud coal coast coat coffee coin cold collar color comb come common cook copper corn corner cotton cough
country cousin cover cow crack cream crowd crown cry cup curtain cushion cut dance danger dark daughter
day dear deep deer desert desk dinner dirty dish doctor dog door double dream dress drink drive drop drum
dry duck dust eagle ear early earth east easy eat edge egg elbow empty engine enjoy enough even evening
event exact eye face fact fair fall family farm fast father feather feel fence field fight finger fire
fish flag flame floor flower fly fog follow food foot forest fork fox frame free fresh friend frog front
fruit full funny garden gate gentle ghost gift girl give glad glass glove goat gold good grain grape grass
great green grey ground group grow guard guess guide hair hall hammer hand happy harbor hard hat head
health heart heavy hill history hold hole holiday home honey hook hope horn horse hospital hot hour house
hungry hunt idea ink insect iron island jacket jam jelly jewel join journey joy judge juice jump kettle
key kind king kitchen kite knee knife knot lake lamp land large late laugh lawn lazy leaf learn leather
left leg lemon letter library light lily line lion lip listen little live lock long loud love low lucky
lunch machine magic mail map market marble match meadow meal metal milk mind mirror money monkey moon
morning mother mountain mouse mouth move music nail narrow nation near neck needle nest net new night
noise north nose note number nurse nut ocean office oil old onion open orange oven owl page paint pan
paper parent park party paste path peace pear pen pencil pepper piano picture pig pillow pin pipe place
plant plate play pocket poem point polish pond potato powder prince print prize pull pump purple queen
quick quiet rabbit rain rainbow river road rock roof room root rope rose round royal rubber ruler run
sad safe sail salt sand school science sea season seat seed shadow sheep shelf shell ship shirt shoe
shop short silver simple sing sister sky sleep slow small smile smoke snake snow soap sock soft soldier
song soup south space spoon spring square stamp star station steam steel stem stick stone storm story
street string sugar summer sun supper sweet table tail teacher tent thread thumb ticket tiger timber
tin toe tomato tongue tooth top towel tower town toy train tree truck tulip turtle umbrella uncle valley
village violin voice wagon walk wall warm wash watch water wave wax weather wheel whistle white wide
wind window wing winter wire wise wolf wood wool worm yard yellow young zebra
"""

#: The shipped words: unique, lowercase, alphabetic, in a fixed order.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_RAW.split()))

assert all(w.isalpha() and w.islower() for w in WORDS)
