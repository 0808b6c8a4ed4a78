"""Class names and palettes of the named datasets, indexed by the raw label id stored in their PNGs.

Cityscapes: the 34 labelIds of the official label table (0..33) plus license plate (kept as id 34, the
35th input of SPADE/SDM), with the official colours. ADE20K: SceneParsing's objectInfo150 with 0 = other.
COCO-Stuff: stuffthingmaps ids 0..181 (COCO category id - 1, with the 11 unused thing ids named).
CelebAMask-HQ: the 19 merged-mask classes. Palettes without an official table use the PASCAL colour map.
"""

from __future__ import annotations

from sdm.labels import default_palette

CITYSCAPES = [
    ("unlabeled", (0, 0, 0)), ("ego vehicle", (0, 0, 0)), ("rectification border", (0, 0, 0)),
    ("out of roi", (0, 0, 0)), ("static", (0, 0, 0)), ("dynamic", (111, 74, 0)), ("ground", (81, 0, 81)),
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("parking", (250, 170, 160)),
    ("rail track", (230, 150, 140)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("guard rail", (180, 165, 180)), ("bridge", (150, 100, 100)),
    ("tunnel", (150, 120, 90)), ("pole", (153, 153, 153)), ("polegroup", (153, 153, 153)),
    ("traffic light", (250, 170, 30)), ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)), ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)), ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("caravan", (0, 0, 90)),
    ("trailer", (0, 0, 110)), ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)),
    ("license plate", (0, 0, 142)),
]

ADE20K = ["other"] + (
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,table,"
    "mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,armchair,seat,fence,"
    "desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,chest of drawers,counter,sand,sink,"
    "skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,case,pool table,pillow,screen door,stairway,"
    "river,bridge,bookcase,blind,coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,kitchen island,"
    "computer,swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,awning,streetlight,"
    "booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,escalator,ottoman,bottle,buffet,"
    "poster,stage,van,ship,fountain,conveyer belt,canopy,washer,plaything,swimming pool,stool,barrel,basket,"
    "waterfall,tent,bag,minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,animal,bicycle,lake,"
    "dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,pier,crt screen,plate,"
    "monitor,bulletin board,shower,radiator,glass,clock,flag"
).split(",")

COCO_STUFF = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,street sign,stop sign,"
    "parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,hat,backpack,umbrella,shoe,"
    "eye glasses,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,baseball glove,"
    "skateboard,surfboard,tennis racket,bottle,plate,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,"
    "orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,mirror,dining table,window,desk,"
    "toilet,door,tv,laptop,mouse,remote,keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,blender,book,"
    "clock,vase,scissors,teddy bear,hair drier,toothbrush,hair brush,"
    "banner,blanket,branch,bridge,building-other,bush,cabinet,cage,cardboard,carpet,ceiling-other,ceiling-tile,"
    "cloth,clothes,clouds,counter,cupboard,curtain,desk-stuff,dirt,door-stuff,fence,floor-marble,floor-other,"
    "floor-stone,floor-tile,floor-wood,flower,fog,food-other,fruit,furniture-other,grass,gravel,ground-other,hill,"
    "house,leaves,light,mat,metal,mirror-stuff,moss,mountain,mud,napkin,net,paper,pavement,pillow,plant-other,"
    "plastic,platform,playingfield,railing,railroad,river,road,rock,roof,rug,salad,sand,sea,shelf,sky-other,"
    "skyscraper,snow,solid-other,stairs,stone,straw,structural-other,table,tent,textile-other,towel,tree,vegetable,"
    "wall-brick,wall-concrete,wall-other,wall-panel,wall-stone,wall-tile,wall-wood,water-other,waterdrops,"
    "window-blind,window-other,wood"
).split(",")

CELEBAMASK_HQ = [
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
]


def dataset_classes(name: str) -> tuple[list[str], list[list[int]]]:
    """(class names, RGB palette) of a named dataset, one entry per raw label id."""
    if name == "cityscapes":
        return [n for n, _ in CITYSCAPES], [list(c) for _, c in CITYSCAPES]
    names = {"ade20k": ADE20K, "coco_stuff": COCO_STUFF, "celebamask_hq": CELEBAMASK_HQ}[name]
    return list(names), [list(c) for c in default_palette(len(names))]
